"""Remote functions: calling StateFun request-reply endpoints (``invoker``), serving ours to a
StateFun runtime (``handler``), ``module.yaml`` (``module_yaml``) and the protobuf messages (``protocol``)."""
