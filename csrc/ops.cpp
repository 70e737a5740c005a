// The rtmdet operator library: schemas (TORCH_LIBRARY) and the Python module rtmdet._C.
// Kernels live in cpu/*.cpp and cuda/*.cu and register with TORCH_LIBRARY_IMPL; fake
// (meta) kernels and autograd formulas are registered from Python, rtmdet/ops/_native.py.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(rtmdet, m) {
  m.def("box_iou(Tensor boxes1, Tensor boxes2, bool giou=False, bool aligned=False, "
        "float eps=1e-6) -> Tensor");
  m.def("dsl_assign(Tensor priors, Tensor pred_bboxes, Tensor pred_logits, Tensor gt_bboxes, "
        "Tensor gt_labels, Tensor gt_mask, int topk, float soft_center_radius, "
        "float iou_weight, bool mmyolo) -> (Tensor, Tensor, Tensor)");
  m.def("quality_focal_loss(Tensor logits, Tensor labels, Tensor scores, float beta) -> Tensor");
  m.def("quality_focal_loss_backward(Tensor grad, Tensor logits, Tensor labels, Tensor scores, "
        "float beta) -> (Tensor, Tensor)");
  m.def("giou_loss(Tensor pred, Tensor target, float eps) -> Tensor");
  m.def("giou_loss_backward(Tensor grad, Tensor pred, Tensor target, float eps) "
        "-> (Tensor, Tensor)");
  m.def("nms(Tensor boxes, Tensor scores, float iou_threshold) -> Tensor");
  m.def("hungarian_match(Tensor cost, Tensor gt_mask) -> (Tensor, Tensor)");
  m.def("detr_match_cost(Tensor pred_logits, Tensor pred_boxes, Tensor gt_boxes, Tensor gt_labels, "
        "Tensor image_sizes, Tensor? gt_mask, str cls_cost, float cls_weight, float l1_weight, "
        "float giou_weight, float focal_alpha, float focal_gamma, float eps) -> Tensor");
}

namespace {

const char* kOps[] = {"box_iou", "dsl_assign", "quality_focal_loss", "giou_loss", "nms",
                      "hungarian_match", "detr_match_cost"};

PyObject* registered_ops(PyObject*, PyObject*) {
  const Py_ssize_t n = sizeof(kOps) / sizeof(kOps[0]);
  PyObject* list = PyList_New(n);
  if (list == nullptr) return nullptr;
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* s = PyUnicode_FromString(kOps[i]);
    if (s == nullptr) {
      Py_DECREF(list);
      return nullptr;
    }
    PyList_SET_ITEM(list, i, s);
  }
  return list;
}

PyObject* with_cuda(PyObject*, PyObject*) {
#ifdef RTMDET_WITH_CUDA
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

PyMethodDef kMethods[] = {
    {"registered_ops", registered_ops, METH_NOARGS,
     "Names of the public ops this build registered in torch.ops.rtmdet."},
    {"with_cuda", with_cuda, METH_NOARGS, "Whether the CUDA kernels were compiled in."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_C",
                       "rtmdet native ops; loading it registers torch.ops.rtmdet.*", -1, kMethods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&kModule); }
