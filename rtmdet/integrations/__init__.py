"""Drop-in adapters that put rtmdet's fused ops into outside detection frameworks.

One module per framework, imported only on request (importing `rtmdet` never imports
them, and this package imports no framework):

- `rtmdet.integrations.mmdet` (mmdetection 3.x): importing it registers
  `FusedDynamicSoftLabelAssigner` and `FusedHungarianAssigner` in mmdet's `TASK_UTILS`, and
  `FusedRTMDetHead`, `FusedRTMDetSepBNHead`, `FusedRTMDetInsSepBNHead`, `FusedDETRHead`,
  `FusedDeformableDETRHead`, `FusedDINOHead` in mmdet's `MODELS`. Configs name it through
  `custom_imports=dict(imports=['rtmdet.integrations.mmdet'], allow_failed_imports=False)`.
- `rtmdet.integrations.mmyolo` (mmyolo 0.6): `FusedBatchDynamicSoftLabelAssigner`.
- `rtmdet.integrations.ultralytics`: `DSLAssigner`, `DSLADetectionLoss`, `DSLADetectionTrainer`.

Each adapter only translates the framework's structures to `rtmdet.ops` / `rtmdet.head_loss`
calls and back; a missing framework gives an ImportError saying what to install.
"""
