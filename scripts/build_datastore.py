"""Build a drafter directory's n-gram datastore from the target's own responses.

    python -m scripts.build_datastore --out neuron_peagle/drafters/smollm2-135m-instruct-peagle

Reads a responses file of the training data format (JSON lines of "prompt_ids" / "response_ids",
gzip or plain; default: the repository's archive for the default model, training_data/) and writes
`datastore.safetensors` into --out (neuron_peagle.datastore; the lookup is graphs/datastore_lookup.py). A
drafter directory's `checksums.json`, where it has one, records the new file's sha256 too.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from neuron_peagle.config import ModelConfig
from neuron_peagle.datastore import DATASTORE_FILE, DatastoreConfig, build_entries, read_response_sequences, save_datastore
from neuron_peagle.default_model import require_default_model
from neuron_peagle.errors import NeuronPeagleError

ARCHIVE = Path(__file__).resolve().parents[1] / "training_data" / "SmolLM2-135M-Instruct.jsonl.gz"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="drafter directory to write datastore.safetensors into")
    parser.add_argument("--model", type=Path, default=None, help="target directory (default: the embedded model)")
    parser.add_argument("--responses", type=Path, default=ARCHIVE, help="responses file (default: %(default)s)")
    defaults = DatastoreConfig()
    parser.add_argument("--max-order", type=int, default=defaults.max_order, help="longest n-gram looked up")
    parser.add_argument("--min-order", type=int, default=defaults.min_order, help="shortest n-gram looked up")
    parser.add_argument("--min-count", type=int, default=defaults.min_count,
                        help="n-grams seen fewer times are left out")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = DatastoreConfig(args.max_order, args.min_order, args.min_count)
        vocab_size = ModelConfig.from_dir(args.model or require_default_model()).vocab_size
        started = time.perf_counter()
        sequences = read_response_sequences(args.responses, context_tokens=config.max_order)
        entries = build_entries(sequences, config)
        out = args.out / DATASTORE_FILE
        save_datastore(entries, out, vocab_size, config, source=args.responses.name)
    except (NeuronPeagleError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    sizes = ", ".join(f"{len(keys)} {n}-grams" for n, (keys, _) in sorted(entries.items()))
    print(f"{out}: {sizes} from {len(sequences)} responses ({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
