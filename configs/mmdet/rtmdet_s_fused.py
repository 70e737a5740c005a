# RTMDet-s (mmdetection 3.x) with rtmdet's batched assigner and fused QFL/GIoU losses.
# The three lines that differ from mmdet's own config: the base, the import, the head type.
_base_ = 'mmdet::rtmdet/rtmdet_s_8xb32-300e_coco.py'
custom_imports = dict(imports=['rtmdet.integrations.mmdet'], allow_failed_imports=False)
model = dict(bbox_head=dict(type='FusedRTMDetSepBNHead'))
