"""One-time conversion of pytorch-fid's Inception weights (.pth, needs torch) to a torch-free .npz.

    python experiments/convert_inception.py pt_inception-2015-12-05-6726825d.pth inception_fid.npz

The .npz keeps the state_dict names (BatchNorm ``num_batches_tracked`` counters dropped); sdejax
loads it with ``sdejax.evaluation.inception.load_weights(path)`` or via $SDEJAX_INCEPTION_WEIGHTS.
The .npz also records the .pth's sha256, so results say whether they come from the standard file
(``inception_weights.STANDARD_SHA256``). The printed checksum is ``inception.weights_sha256``: the
same for the .pth and the .npz, and recorded in every statistics file and evaluation result.
"""
import argparse

import jax

from sdejax.evaluation import inception, inception_weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help=f"the .pth file ({inception_weights.WEIGHTS_FILE})")
    parser.add_argument("target", help="the .npz file to write")
    args = parser.parse_args()
    state_dict = inception_weights.load_state_dict(args.source)
    variables = inception.from_torch_state_dict(state_dict)  # fails here on a wrong file
    source = inception_weights.file_sha256(args.source)
    inception_weights.save_state_dict(state_dict, args.target, source_sha256=source)
    arrays = len(jax.tree.leaves(variables))
    standard = "the standard file" if source == inception_weights.STANDARD_SHA256 else "NOT the standard file"
    print(f"wrote {args.target}: {arrays} arrays, weights_sha256 {inception.weights_sha256(variables)}; "
          f"source sha256 {source} ({standard})")


if __name__ == "__main__":
    main()
