"""The data of lrft's lm-eval tasks (loaded by lm-eval from the task files beside this one)."""

from pathlib import Path

SHIPPED_DEV = Path(__file__).resolve().parents[1] / "samples" / "commonsense" / "dev"


def load_dataset(task: str, data=None, **_metadata):
    """``{"test": rows}`` of one commonsense task: prompt, choices (each the whole trained answer) and the
    index of the gold one; from ``data`` (a folder as ``lrft eval --data`` takes) or the shipped subsets."""
    import datasets

    from lrft.data import eval_prompt
    from lrft.evaluate import LOGLIK_PREFIX, candidate_labels, find_task_files, read_task_records

    files = find_task_files(data or SHIPPED_DEV)
    if task not in files:
        from lrft.errors import UserError

        raise UserError(f"task {task} has no file in {data}; tasks found there: {', '.join(files)}")
    rows = []
    for record in read_task_records(files[task], task):
        labels = candidate_labels(task, record["instruction"])
        rows.append({
            "prompt": eval_prompt(record["instruction"]),
            "choices": [LOGLIK_PREFIX + label for label in labels],
            "gold": labels.index(record["answer"]) if record["answer"] in labels else -1,
        })
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
