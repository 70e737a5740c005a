"""One call of the Triton DSLA at B=64, N=8400, G=32 for Nsight Compute:
ncu --kernel-name regex:"_gt_kernel|_prior_kernel" python benches/ncu_dsla.py"""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from rtmdet.kernels import dsla  # noqa: E402
from tests.cases import case_args, make_case  # noqa: E402

args = case_args(make_case(7, B=64, img_size=(640, 640), G=32, C=80, kind="random", device="cuda"))
for _ in range(2):
    dsla.dsl_assign_triton(*args)
torch.cuda.synchronize()
