"""The merge methods: pure functions of the tensors of one name, one file per method or family.

Every method is registered in the one dict :data:`modelfuse.merge.registry.METHODS`;
the engine (configuration, plan, execution) lives in :mod:`modelfuse.merge`.
The task-vector family (task arithmetic, TIES, DARE, breadcrumbs, DELLA) are
settings of :func:`~modelfuse.merge.methods.task_vectors.generalized_task_arithmetic`.
"""

__all__: list[str] = []
