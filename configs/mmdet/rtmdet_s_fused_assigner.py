# RTMDet-s (mmdetection 3.x) with only the assigner swapped: stock head, stock losses, one
# rtmdet.ops.dsl_assign call per image instead of mmdet's DynamicSoftLabelAssigner.
_base_ = 'mmdet::rtmdet/rtmdet_s_8xb32-300e_coco.py'
custom_imports = dict(imports=['rtmdet.integrations.mmdet'], allow_failed_imports=False)
model = dict(train_cfg=dict(assigner=dict(type='FusedDynamicSoftLabelAssigner')))
