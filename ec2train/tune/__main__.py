"""`python -m ec2train.tune SETUP_FILE LABEL SEQ`: one trial process of a parallel study."""

import sys

from ec2train.tune.parallel import worker_main

sys.exit(worker_main(sys.argv[1:]))
