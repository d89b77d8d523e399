"""Optional: publish the merged model (with its model card) to the Hugging Face hub after a run.

The repository comes from the config (`hub.repo_id`); the token only from the environment (`HF_TOKEN`) or
the Prefect Secret block `hf-token`, never from the config, a parameter or a log line.
"""

from __future__ import annotations

from pathlib import Path

from prefect import task

from loraflow.config import HubSettings
from loraflow.errors import ModelError
from loraflow.tasks.models import hf_token
from loraflow.tasks.store import retry_unless_user_error, run_logger


@task(
    name="push-to-hub",
    task_run_name=lambda parameters: f"push-to-hub-{parameters['hub'].repo_id}",
    retries=2,
    retry_delay_seconds=[10, 60],
    retry_condition_fn=retry_unless_user_error,
)
def push_to_hub(run_dir: str, hub: HubSettings) -> str:
    """Upload `<run_dir>/merged/` to the hub repository `hub.repo_id`; returns the commit URL."""
    from huggingface_hub import HfApi

    token = hf_token()
    if not token:
        raise ModelError(
            f"hub.repo_id is {hub.repo_id!r} but no token is set: export HF_TOKEN (a write token) or "
            "register the Prefect Secret block 'hf-token'"
        )
    api = HfApi(token=token)
    api.create_repo(hub.repo_id, private=hub.private, exist_ok=True, repo_type="model")
    commit = api.upload_folder(
        repo_id=hub.repo_id,
        folder_path=str(Path(run_dir) / "merged"),
        commit_message=f"loraflow run {Path(run_dir).name}",
        repo_type="model",
    )
    url = str(getattr(commit, "commit_url", commit))
    run_logger().info("pushed %s to the hub: %s", Path(run_dir) / "merged", url)
    return url
