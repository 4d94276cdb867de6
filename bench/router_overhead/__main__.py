import sys

from bench.router_overhead.run import main

sys.exit(main())
