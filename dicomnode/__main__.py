import sys

from dicomnode.cli.main import main

sys.exit(main())
