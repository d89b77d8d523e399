"""loraflow's Prefect tasks (installed as loraflow.tasks): shared steps here, one package per approach."""
