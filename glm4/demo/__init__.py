"""The bundled demo model: a toy GLM-4-architecture checkpoint for trying the software offline."""

from pathlib import Path

DEMO_MODEL_DIR = Path(__file__).parent / "model"
