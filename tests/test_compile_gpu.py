"""dsl_assign + both losses in one function on the GPU (fused backends, "auto"):
torch.compile(fullgraph=True) and CUDA-graph capture give the eager results."""
import pytest
import torch

from rtmdet import ops
from tests.cases import case_args, make_case

pytestmark = pytest.mark.gpu


def step(priors, pred_bboxes, logits, gt_bboxes, gt_labels, gt_mask):
    """Assignment, QFL and GIoU as the head loss uses them; returns (loss, gt_index)."""
    a = ops.dsl_assign(priors, pred_bboxes.detach(), logits.detach(), gt_bboxes, gt_labels,
                       gt_mask)
    C = logits.shape[-1]
    labels = torch.where(a.labels >= 0, a.labels, torch.full_like(a.labels, C))
    cls = ops.quality_focal_loss(logits.flatten(0, 1), labels.flatten(), a.ious.flatten(),
                                 reduction="sum")
    index = a.gt_index.clamp(min=0)[..., None].expand(-1, -1, 4)
    targets = torch.gather(gt_bboxes, 1, index)
    box = ops.giou_loss(pred_bboxes.flatten(0, 1), targets.flatten(0, 1),
                        weight=a.ious.flatten(), reduction="sum")
    return cls + box, a.gt_index


def cuda_case(seed):
    case = make_case(seed, B=4, G=20, C=80, kind="mixed", pad="anywhere", device="cuda")
    args = list(case_args(case))
    args[1] = args[1].clone().requires_grad_()
    args[2] = args[2].clone().requires_grad_()
    return args


def test_compile_fullgraph_equals_eager():
    with ops.value_checks(False):
        args = cuda_case(0)
        loss, index = step(*args)
        loss.backward()
        grads = [args[1].grad.clone(), args[2].grad.clone()]
        args[1].grad = args[2].grad = None
        compiled = torch.compile(step, fullgraph=True)
        loss_c, index_c = compiled(*args)
        loss_c.backward()
    assert torch.equal(index, index_c)
    torch.testing.assert_close(loss_c, loss)
    torch.testing.assert_close(args[1].grad, grads[0])
    torch.testing.assert_close(args[2].grad, grads[1])


def test_cuda_graph_replay_equals_eager():
    with ops.value_checks(False):
        static = cuda_case(1)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                step(*static)[0].backward()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        for t in static[1:3]:
            t.grad = None
        with torch.cuda.graph(graph):
            loss_g, index_g = step(*static)
            loss_g.backward()
        for seed in (2, 3):  # new inputs copied into the captured tensors, then replayed
            fresh = cuda_case(seed)
            with torch.no_grad():
                for dst, src in zip(static, fresh):
                    dst.copy_(src)
            for t in static[1:3]:
                t.grad.zero_()
            graph.replay()
            loss, index = step(*fresh)
            loss.backward()
            assert torch.equal(index_g, index)
            torch.testing.assert_close(loss_g, loss)
            torch.testing.assert_close(static[2].grad, fresh[2].grad)
            torch.testing.assert_close(static[1].grad, fresh[1].grad)
