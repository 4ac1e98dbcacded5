"""Planning: an experiment resolved once into typed runs and fine-tunes
(:mod:`~fcr_eval.plan.planner`: :class:`Plan`, :class:`PlannedRun`, :class:`PlannedFinetune`),
the samplers built into fcr-sample's configs (:mod:`~fcr_eval.plan.samplers`), and the checks
``run`` makes before any work (:mod:`~fcr_eval.plan.validation`), and a Stable Diffusion UNet's
FLOPs counted from its config (:mod:`~fcr_eval.plan.unet_flops`, with the shipped
``unet_configs/`` of the designed models): planning needs no torch, no model and no network.
"""
