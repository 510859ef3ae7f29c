import sys

from glm4.cli import main

sys.exit(main())
