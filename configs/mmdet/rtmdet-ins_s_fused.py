# RTMDet-Ins-s (mmdetection 3.x) with rtmdet's fused QFL/GIoU losses and batched targets.
# Mask gts: the assignment uses stock's DynamicSoftLabelAssigner per image (mask centres).
_base_ = 'mmdet::rtmdet/rtmdet-ins_s_8xb32-300e_coco.py'
custom_imports = dict(imports=['rtmdet.integrations.mmdet'], allow_failed_imports=False)
model = dict(bbox_head=dict(type='FusedRTMDetInsSepBNHead'))
