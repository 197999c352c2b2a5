"""A small generated instance-segmentation dataset in COCO format ("shapes").

COCO is not on every machine, but "does it train?" is the first question. This module draws
images of circles, rectangles, triangles and stars on noisy or gradient backgrounds, with
overlaps, and writes them the way COCO ships: ``annotations/instances_{train,val}.json`` and one
PNG folder per split. mmdet's ``CocoDataset`` reads it like any COCO data.

Determinism: every image has its own random stream, seeded by (seed, split, index), and all
geometry is rasterised with numpy at pixel centres (no drawing library whose anti-aliasing might
change between versions), so the same settings always give the same files.

Occlusion: shapes are painted in order, later ones on top. An instance's mask is the part of it
that stays visible. An instance hidden for the most part (or left with very few pixels) is dropped
entirely: its annotation is not written and its visible remnants are painted over with the
background, so that nothing visible in an image is left unannotated.

Command line::

    python -m mlla_det.datasets.shapes --out data/shapes --seed 0 --num-train 1000 --num-val 100
"""
import argparse
import dataclasses
import json
import os
import sys

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

CLASSES = ('circle', 'rectangle', 'triangle', 'star')

# Bump whenever the drawing changes: the manifest records it, so old data gets regenerated.
GENERATOR_VERSION = 1

MANIFEST_NAME = 'manifest.json'
SPLITS = ('train', 'val')
_SPLIT_STREAM_ID = {'train': 0, 'val': 1}


@dataclasses.dataclass(frozen=True)
class ShapesSettings:
    """Everything that decides the generated files; recorded in the manifest."""

    seed: int = 0
    num_train: int = 1000
    num_val: int = 100
    image_size: int = 256
    max_objects: int = 6
    # Circumradius of a shape as a fraction of the image side.
    min_size: float = 0.07
    max_size: float = 0.22
    # An instance keeps its annotation only if this much of it stays visible...
    min_visible_fraction: float = 0.4
    # ...and it keeps at least this many pixels.
    min_visible_pixels: int = 12

    def __post_init__(self):
        problems = []
        if not isinstance(self.seed, int) or self.seed < 0:
            problems.append(f'seed must be a non-negative integer, got {self.seed!r}')
        for name in ('num_train', 'num_val'):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                problems.append(f'{name} must be a positive integer, got {value!r}')
        if not isinstance(self.image_size, int) or self.image_size < 48:
            problems.append(f'image_size must be an integer >= 48 (pixels), got {self.image_size!r}')
        if not isinstance(self.max_objects, int) or self.max_objects < 1:
            problems.append(f'max_objects must be a positive integer, got {self.max_objects!r}')
        if not 0 < self.min_size <= self.max_size < 0.5:
            problems.append(f'need 0 < min_size <= max_size < 0.5 (fractions of the image side), '
                            f'got min_size={self.min_size!r}, max_size={self.max_size!r}')
        if not 0 <= self.min_visible_fraction <= 1:
            problems.append(f'min_visible_fraction must lie in [0, 1], got {self.min_visible_fraction!r}')
        if not isinstance(self.min_visible_pixels, int) or self.min_visible_pixels < 1:
            problems.append(f'min_visible_pixels must be a positive integer, got {self.min_visible_pixels!r}')
        if problems:
            raise ValueError('invalid shapes dataset settings: ' + '; '.join(problems))

    def count(self, split):
        return {'train': self.num_train, 'val': self.num_val}[split]


@dataclasses.dataclass
class ShapeInstance:
    """One drawn shape: its class, its full silhouette and the part of it left visible."""

    category: int  # index into CLASSES
    full_mask: np.ndarray  # bool (H, W): the shape as if nothing covered it
    visible_mask: np.ndarray  # bool (H, W): what stays visible after later shapes are drawn
    color: tuple


# ----------------------------------------------------------------------------------------------
# Rasterisation: pixel (row y, column x) belongs to a shape when its centre (x + .5, y + .5) does.

def _pixel_centres(size):
    coords = np.arange(size, dtype=np.float64) + 0.5
    return coords[None, :], coords[:, None]  # xs (1, W), ys (H, 1)


def circle_mask(size, cx, cy, radius):
    xs, ys = _pixel_centres(size)
    return (xs - cx) ** 2 + (ys - cy) ** 2 <= radius ** 2


def convex_polygon_mask(size, vertices):
    """Pixels inside a convex polygon given by its vertices in order (either orientation)."""
    vertices = np.asarray(vertices, dtype=np.float64)
    xs, ys = _pixel_centres(size)
    edges = np.roll(vertices, -1, axis=0) - vertices
    # Twice the signed area: its sign says which side of every edge is the inside.
    orientation = np.sign(np.sum(vertices[:, 0] * np.roll(vertices[:, 1], -1)
                                 - np.roll(vertices[:, 0], -1) * vertices[:, 1]))
    if orientation == 0:
        return np.zeros((size, size), dtype=bool)
    inside = np.ones((size, size), dtype=bool)
    for (ax, ay), (ex, ey) in zip(vertices, edges):
        inside &= orientation * (ex * (ys - ay) - ey * (xs - ax)) >= 0
    return inside


def star_mask(size, cx, cy, radius, inner_ratio, rotation, points=5):
    """A star as the union of its inner polygon and one triangle per tip (all convex)."""
    outer_angles = rotation + 2 * np.pi * np.arange(points) / points
    inner_angles = outer_angles + np.pi / points
    inner_radius = radius * inner_ratio
    outer = np.stack([cx + radius * np.cos(outer_angles), cy + radius * np.sin(outer_angles)], 1)
    inner = np.stack([cx + inner_radius * np.cos(inner_angles),
                      cy + inner_radius * np.sin(inner_angles)], 1)
    mask = convex_polygon_mask(size, inner)
    for i in range(points):
        mask |= convex_polygon_mask(size, [inner[i - 1], outer[i], inner[i]])
    return mask


# ----------------------------------------------------------------------------------------------
# Drawing

def _random_shape_mask(rng, category, size, settings):
    radius = rng.uniform(settings.min_size, settings.max_size) * size
    cx, cy = rng.uniform(radius, size - radius, size=2)
    rotation = rng.uniform(0, 2 * np.pi)
    name = CLASSES[category]
    if name == 'circle':
        return circle_mask(size, cx, cy, radius * 0.85)
    if name == 'rectangle':
        # Half-diagonal = radius; the aspect ratio stays moderate so it never looks like a line.
        half_angle = np.arctan(rng.uniform(0.45, 1.0))
        corner_angles = rotation + np.array([half_angle, np.pi - half_angle,
                                             np.pi + half_angle, 2 * np.pi - half_angle])
        return convex_polygon_mask(size, np.stack([cx + radius * np.cos(corner_angles),
                                                   cy + radius * np.sin(corner_angles)], 1))
    if name == 'triangle':
        # Jittered equilateral: never degenerate, yet not all alike.
        angles = rotation + np.array([0.0, 2 * np.pi / 3, 4 * np.pi / 3]) + rng.uniform(-0.35, 0.35, 3)
        radii = radius * rng.uniform(0.85, 1.0, 3)
        return convex_polygon_mask(size, np.stack([cx + radii * np.cos(angles),
                                                   cy + radii * np.sin(angles)], 1))
    if name == 'star':
        return star_mask(size, cx, cy, radius, rng.uniform(0.45, 0.55), rotation)
    raise AssertionError(f'no drawing for class {name!r}')


def _background(rng, size):
    """A float (H, W, 3) background: a gradient, smooth blobs or a noisy flat colour."""
    kind = rng.integers(3)
    xs, ys = _pixel_centres(size)
    if kind == 0:  # linear gradient between two colours in a random direction
        start, end = rng.uniform(0, 255, (2, 3))
        angle = rng.uniform(0, 2 * np.pi)
        t = (np.cos(angle) * xs + np.sin(angle) * ys) / size
        t = (t - t.min()) / max(t.max() - t.min(), 1e-9)
        image = start + t[..., None] * (end - start)
    elif kind == 1:  # low-frequency blobs: a coarse random grid, bilinearly upsampled
        cells = int(rng.integers(2, 5))
        grid = rng.uniform(0, 255, (cells + 1, cells + 1, 3))
        u = (xs / size * cells)[0]
        v = (ys / size * cells)[:, 0]
        u0 = np.minimum(u.astype(int), cells - 1)
        v0 = np.minimum(v.astype(int), cells - 1)
        fu = (u - u0)[None, :, None]
        fv = (v - v0)[:, None, None]
        top = grid[v0][:, u0] * (1 - fu) + grid[v0][:, u0 + 1] * fu
        bottom = grid[v0 + 1][:, u0] * (1 - fu) + grid[v0 + 1][:, u0 + 1] * fu
        image = top * (1 - fv) + bottom * fv
    else:  # flat colour with strong pixel noise
        image = rng.uniform(0, 255, 3) + rng.normal(0, 25, (size, size, 3))
    return np.broadcast_to(image, (size, size, 3)).astype(np.float64)


def _contrasting_color(rng, reference, min_distance=90.0, tries=20):
    """A colour at least `min_distance` (RGB, L2) from `reference`, or the farthest of `tries`."""
    candidates = rng.uniform(0, 255, (tries, 3))
    distances = np.linalg.norm(candidates - reference, axis=1)
    good = np.flatnonzero(distances >= min_distance)
    return candidates[good[0]] if good.size else candidates[np.argmax(distances)]


def render_image(rng, settings):
    """Draw one image. Returns (uint8 (H, W, 3) image, [ShapeInstance] kept, in drawing order)."""
    size = settings.image_size
    background = _background(rng, size)
    num_objects = int(rng.integers(1, settings.max_objects + 1))
    owner = np.full((size, size), -1, dtype=np.int64)  # index of the topmost shape at each pixel
    drawn = []
    for index in range(num_objects):
        category = int(rng.integers(len(CLASSES)))
        full = _random_shape_mask(rng, category, size, settings)
        color = _contrasting_color(rng, background[full].mean(axis=0))
        owner[full] = index
        drawn.append((category, full, color))

    kept = []
    image = background.copy()
    for index, (category, full, color) in enumerate(drawn):
        visible = owner == index
        visible_pixels = int(visible.sum())
        if (visible_pixels < settings.min_visible_pixels
                or visible_pixels < settings.min_visible_fraction * full.sum()):
            continue  # mostly hidden: dropped, its remnants stay background
        image[visible] = color
        kept.append(ShapeInstance(category, full, visible, tuple(float(c) for c in color)))
    image += rng.normal(0, 6, image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), kept


def image_rng(seed, split, index):
    """The independent random stream of one image: adding images never changes earlier ones."""
    return np.random.default_rng([seed, _SPLIT_STREAM_ID[split], index])


# ----------------------------------------------------------------------------------------------
# COCO writing

def encode_mask(mask):
    """Compressed RLE as COCO json stores it (counts as a str)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {'size': [int(s) for s in rle['size']], 'counts': rle['counts'].decode('ascii')}


def mask_bbox(mask):
    """COCO [x, y, width, height] of the pixels of a mask, as whole pixels."""
    cols = np.flatnonzero(mask.any(axis=0))
    rows = np.flatnonzero(mask.any(axis=1))
    return [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]


def _coco_skeleton(settings, split):
    return {
        'info': {'description': f'mlla_det generated shapes, {split} split',
                 'version': str(GENERATOR_VERSION), 'year': 2024,
                 'contributor': 'mlla_det.datasets.shapes', 'date_created': ''},
        'licenses': [],
        'images': [],
        'annotations': [],
        'categories': [{'id': i + 1, 'name': name, 'supercategory': 'shape'}
                       for i, name in enumerate(CLASSES)],
    }


def _draw_and_save(job):
    """Draw image `index` of a split, write its PNG, return its annotations (without ids)."""
    out_dir, split, index, settings = job
    image, instances = render_image(image_rng(settings.seed, split, index), settings)
    Image.fromarray(image).save(os.path.join(out_dir, split, image_file_name(index)))
    return [{'category_id': instance.category + 1,
             'segmentation': encode_mask(instance.visible_mask),
             'area': int(instance.visible_mask.sum()),
             'bbox': mask_bbox(instance.visible_mask),
             'iscrowd': 0} for instance in instances]


def image_file_name(index):
    return f'{index:06d}.png'


def _map_in_order(function, jobs, workers):
    if workers <= 1 or len(jobs) < 2 * workers:
        return [function(job) for job in jobs]
    import multiprocessing
    # Every image has its own random stream, so the work splits freely; imap keeps the order.
    with multiprocessing.get_context('fork').Pool(workers) as pool:
        return list(pool.imap(function, jobs, chunksize=8))


def generate_split(out_dir, split, settings, workers=1):
    """Draw and write one split; returns its COCO dict (also written to annotations/)."""
    os.makedirs(os.path.join(out_dir, split), exist_ok=True)
    jobs = [(out_dir, split, index, settings) for index in range(settings.count(split))]
    per_image = _map_in_order(_draw_and_save, jobs, workers)
    coco = _coco_skeleton(settings, split)
    next_annotation_id = 1
    for index, annotations in enumerate(per_image):
        image_id = index + 1
        coco['images'].append({'id': image_id, 'file_name': image_file_name(index),
                               'height': settings.image_size, 'width': settings.image_size})
        for annotation in annotations:
            coco['annotations'].append({'id': next_annotation_id, 'image_id': image_id, **annotation})
            next_annotation_id += 1
    annotation_path = annotation_file(out_dir, split)
    os.makedirs(os.path.dirname(annotation_path), exist_ok=True)
    _write_json_atomically(annotation_path, coco)
    return coco


def annotation_file(out_dir, split):
    return os.path.join(out_dir, 'annotations', f'instances_{split}.json')


def _write_json_atomically(path, data):
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        json.dump(data, f)
    os.replace(tmp, path)


def _manifest(settings):
    return {'generator': 'mlla_det.datasets.shapes', 'version': GENERATOR_VERSION,
            'classes': list(CLASSES), 'settings': dataclasses.asdict(settings)}


def _read_manifest(out_dir):
    try:
        with open(os.path.join(out_dir, MANIFEST_NAME)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def is_complete(out_dir, settings):
    """True when out_dir holds exactly the data these settings produce (manifest + all files)."""
    if _read_manifest(out_dir) != _manifest(settings):
        return False
    for split in SPLITS:
        if not os.path.isfile(annotation_file(out_dir, split)):
            return False
        for index in range(settings.count(split)):
            if not os.path.isfile(os.path.join(out_dir, split, image_file_name(index))):
                return False
    return True


def _remove_previous(out_dir):
    """Delete what an earlier run of this generator wrote (and only that)."""
    manifest_path = os.path.join(out_dir, MANIFEST_NAME)
    if os.path.exists(manifest_path):
        os.remove(manifest_path)  # first, so an interrupted run is never taken for complete
    for split in SPLITS:
        path = annotation_file(out_dir, split)
        if os.path.exists(path):
            os.remove(path)
        image_dir = os.path.join(out_dir, split)
        if os.path.isdir(image_dir):
            for name in os.listdir(image_dir):
                if len(name) == 10 and name.endswith('.png') and name[:6].isdigit():
                    os.remove(os.path.join(image_dir, name))


def default_workers():
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1))


def generate_dataset(out_dir, settings, workers=None):
    """Write the whole dataset (both splits, then the manifest) into out_dir, replacing old data.

    workers: processes drawing images in parallel (default: up to 8); the files do not depend on it.
    """
    workers = default_workers() if workers is None else workers
    os.makedirs(out_dir, exist_ok=True)
    _remove_previous(out_dir)
    for split in SPLITS:
        generate_split(out_dir, split, settings, workers)
    # Written last: its presence means everything before it finished.
    _write_json_atomically(os.path.join(out_dir, MANIFEST_NAME), _manifest(settings))


def ensure_dataset(out_dir, settings=None, verbose=True, workers=None):
    """Generate the dataset unless out_dir already holds the one these settings make.

    Returns True when it (re)generated the data, False when the existing data was reused.
    """
    settings = settings or ShapesSettings()
    if is_complete(out_dir, settings):
        if verbose:
            print(f'shapes dataset: reusing {out_dir} (seed {settings.seed}, '
                  f'{settings.num_train} train / {settings.num_val} val)')
        return False
    if verbose:
        print(f'shapes dataset: generating {settings.num_train} train + {settings.num_val} val images '
              f'of {settings.image_size} px into {out_dir} (seed {settings.seed}) ...', flush=True)
    generate_dataset(out_dir, settings, workers)
    return True


def parse_args(argv=None):
    defaults = ShapesSettings()
    parser = argparse.ArgumentParser(
        prog='python -m mlla_det.datasets.shapes',
        description='Generate the shapes instance-segmentation dataset (COCO format). '
                    'Nothing is written when the folder already holds the data these settings make.')
    parser.add_argument('--out', default='data/shapes', help='output folder (default: data/shapes)')
    parser.add_argument('--seed', type=int, default=defaults.seed)
    parser.add_argument('--num-train', type=int, default=defaults.num_train)
    parser.add_argument('--num-val', type=int, default=defaults.num_val)
    parser.add_argument('--image-size', type=int, default=defaults.image_size, help='side in pixels')
    parser.add_argument('--max-objects', type=int, default=defaults.max_objects,
                        help='at most this many shapes drawn per image')
    parser.add_argument('--workers', type=int, default=None,
                        help='processes drawing in parallel (default: up to 8; same files either way)')
    parser.add_argument('--force', action='store_true', help='regenerate even if up to date')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        settings = ShapesSettings(seed=args.seed, num_train=args.num_train, num_val=args.num_val,
                                  image_size=args.image_size, max_objects=args.max_objects)
    except ValueError as error:
        print(f'error: {error}', file=sys.stderr)
        return 2
    if args.force:
        print(f'shapes dataset: regenerating into {args.out} (--force)', flush=True)
        generate_dataset(args.out, settings, args.workers)
    else:
        ensure_dataset(args.out, settings, workers=args.workers)
    for split in SPLITS:
        print(f'  {split}: {annotation_file(args.out, split)}, images in {os.path.join(args.out, split)}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
