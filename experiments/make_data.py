"""Makes tests/data/mnist16.npz and tests/data/mnist8.npz, the digits of the evidence experiments and quick starts.

    python experiments/make_data.py [--mnist=../shared/data/mnist_test_uint8.npz]

Source: the 10,000 MNIST test digits (28x28 uint8, lossless). 16x16: PIL box (area) resampling of each digit;
8x8: the mean of each 2x2 block of the 16x16 digit, rounded. Both keep the labels as y (int64) and the order.
"""

import argparse
import os

import numpy as np
import PIL.Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--mnist', default=os.path.join(ROOT, '..', 'shared', 'data', 'mnist_test_uint8.npz'))
    args = parser.parse_args()
    with np.load(args.mnist) as npz:
        x, y = npz['x'], npz['y'].astype(np.int64)
    x16 = np.stack([np.asarray(PIL.Image.fromarray(image).resize((16, 16), PIL.Image.BOX)) for image in x])
    x8 = x16.reshape(-1, 8, 2, 8, 2).mean(axis=(2, 4)).round().astype(np.uint8)
    for name, images in (('mnist16', x16), ('mnist8', x8)):
        path = os.path.join(ROOT, 'tests', 'data', f'{name}.npz')
        np.savez_compressed(path, x=images, y=y)
        print(path, images.shape, os.path.getsize(path), 'bytes')


if __name__ == '__main__':
    main()
