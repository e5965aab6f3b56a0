"""Prepare scikit-learn's 8x8 digits (padded to 16x16) as a TFDS dataset, offline.

    python experiments/prepare_digits.py --data_dir=~/tensorflow_datasets --file_format=array_record

array_record feeds the default grain stack (`config.data.stack = "grain"`), tfrecord the
tf.data stack (`"tf"`); run it twice with two data_dirs to have both. No network, no TensorFlow
needed for array_record.
"""
import os

from absl import app, flags

from sdejax.data import digits

flags.DEFINE_string("data_dir", "~/tensorflow_datasets", "TFDS data directory to write into.")
flags.DEFINE_enum("file_format", "array_record", ["array_record", "tfrecord"], "Record format.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    builder = digits.prepare_digits(os.path.expanduser(FLAGS.data_dir), FLAGS.file_format)
    print(f"Prepared {builder.name} in {builder.data_dir}: "
          f"{ {k: v.num_examples for k, v in builder.info.splits.items()} }")


if __name__ == "__main__":
    app.run(main)
