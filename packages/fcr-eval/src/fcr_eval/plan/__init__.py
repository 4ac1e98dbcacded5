"""Planning: an experiment resolved once into typed runs and fine-tunes
(:mod:`~fcr_eval.plan.planner`: :class:`Plan`, :class:`PlannedRun`, :class:`PlannedFinetune`),
what enters a run id and a fine-tune key (:mod:`~fcr_eval.plan.identity`), the cost of a forward
and the machine's throughput (:mod:`~fcr_eval.plan.costs`), the printed and JSON plan
(:mod:`~fcr_eval.plan.output`), the samplers built into fcr-sample's configs
(:mod:`~fcr_eval.plan.samplers`), the checks ``run`` makes before any work
(:mod:`~fcr_eval.plan.validation`), and a Stable Diffusion UNet's FLOPs counted from its config
(:mod:`~fcr_eval.plan.unet_flops`, with the shipped ``unet_configs/`` of the designed models):
planning needs no model and no network.
"""
