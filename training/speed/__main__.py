import sys

from training.speed.bench import main

sys.exit(main())
