"""The paper's MNIST with the paper's CNN, label flip and backdoor, every selection rule and update, five seeds.

    python experiments/paper_mnist_cnn.py --data-dir ~/tensorflow_datasets [--plan] [jaxforget run options]

The configuration and its choices are in ``experiments/paper.py``; this prints the expected time on one GPU first.
"""

import sys

from paper import main

if __name__ == "__main__":
    sys.exit(main("mnist-cnn", sys.argv[1:]))
