# A candidate for the quick start's config, to be timed against it before it ships
# (gpu_session.sh shapes, SHAPES_CONFIGS): the shapes config with the COCO configs' hooks (cuDNN
# off, the blocks as CUDA graphs, dense convolutions as GEMMs) and bf16 without a loss scaler, as
# tools/train.py --amp bf16 runs. Every image is 256 x 256, a multiple of the graphs' 128-pixel
# canvas, so the blocks see one canvas and their outputs are the plain model's up to rounding.
_base_ = '../../configs/mlla/mask-rcnn_mlla-t_fpn_shapes.py'

optim_wrapper = dict(loss_scale=dict(enabled=False))
custom_hooks = [dict(type='RNGStateHook'), dict(type='CudnnHook', enabled=False),
                dict(type='BlockGraphsHook'), dict(type='GemmConvHook')]
