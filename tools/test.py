"""Evaluate a detector with an MLLA backbone: COCO box and mask mAP (mmdetection 3.x style).

    python tools/test.py configs/mlla/mask-rcnn_mlla-t_fpn_1x_coco.py CHECKPOINT [--out results.pkl]
    bash tools/dist_test.sh configs/mlla/mask-rcnn_mlla-t_fpn_1x_coco.py CHECKPOINT 8

The metrics come from the config's test_evaluator (CocoMetric, bbox + segm, via pycocotools).
"""
import argparse
import os

# tools/ is on sys.path when this file runs as a script: share train.py's checks.
from train import (PreflightError, add_common_args, build_runner, checked_config,  # noqa: E402
                   import_mlla_det, leave_process_group, load_config, require_checkpoint, require_config_file,
                   require_dataset)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Test (and evaluate) a detector with an MLLA backbone')
    parser.add_argument('config', help='config file, e.g. configs/mlla/mask-rcnn_mlla-t_fpn_1x_coco.py')
    parser.add_argument('checkpoint', help='checkpoint of the whole detector (e.g. work_dirs/.../epoch_12.pth)')
    parser.add_argument('--work-dir', help='directory for the metrics file and logs '
                        '(default: ./work_dirs/<config name>)')
    parser.add_argument('--out', help='also dump the raw predictions to this pickle file (.pkl / .pickle)')
    parser.add_argument('--show-dir', help='save images painted with the predictions to this '
                        'directory (created under work_dir/<timestamp>/)')
    add_common_args(parser)
    args = parser.parse_args(argv)
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


def prepare(args: argparse.Namespace):
    require_config_file(args.config)
    require_checkpoint(args.checkpoint, 'checkpoint')
    if args.out is not None and not args.out.endswith(('.pkl', '.pickle')):
        raise PreflightError(f"--out must name a pickle file ending in .pkl or .pickle, got {args.out}")
    import_mlla_det()
    cfg = load_config(args)
    cfg.load_from = args.checkpoint
    if args.show_dir:
        enable_painting(cfg, args.show_dir)
    require_dataset(cfg, ['test'])
    return cfg


def enable_painting(cfg, show_dir: str) -> None:
    hook = cfg.get('default_hooks', {}).get('visualization')
    if hook is None:
        raise PreflightError("--show-dir needs default_hooks.visualization "
                             "(dict(type='DetVisualizationHook')) in the config")
    hook['draw'] = True
    hook['test_out_dir'] = show_dir


def main(argv=None) -> None:
    args = parse_args(argv)
    runner = build_runner(checked_config(prepare, args))
    if args.out is not None:
        from mmdet.evaluation import DumpDetResults
        runner.test_evaluator.metrics.append(DumpDetResults(out_file_path=args.out))
    runner.test()
    leave_process_group()


if __name__ == '__main__':
    main()
