"""The paper's CIFAR-10 with ResNet-18, label flip and backdoor, every selection rule and update, five seeds.

    python experiments/paper_cifar10_resnet18.py --data-dir ~/tensorflow_datasets [--plan] [jaxforget run options]

The configuration and its choices are in ``experiments/paper.py``; this prints the expected time on one GPU first.
"""

import sys

from paper import main

if __name__ == "__main__":
    sys.exit(main("cifar10-resnet18", sys.argv[1:]))
