"""Processes: this process's Accelerator (accelerator.py), the sharding engines DeepSpeed (deepspeed.py) and FSDP2
(fsdp.py), where it stands in a cluster (cluster.py), re-invoking a run as a distributed job (relaunch.py), and
accelerate config files for users who launch themselves (launch_config.py)."""
