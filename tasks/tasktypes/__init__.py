"""The task-type registry: name -> TaskType. A task type's rules live in its own module (row validation,
gold answer, scorer, primary metric, report breakdown); everything else looks them up here instead of
branching on the name. Adding a type is one module and one line in TASK_TYPES.

    from tasks.tasktypes import task_type
    kind = task_type(recipe.task)
    kind.score(chat_row, answer, tool_calls, count_tokens), kind.primary_metric, kind.breakdown

Light: no Prefect, no runners, no model code (the training worker and data preparation import it).
"""

from __future__ import annotations

from tasks.tasktypes.base import TaskType
from tasks.tasktypes.keyword import KEYWORD
from tasks.tasktypes.slipstream import SLIPSTREAM
from tasks.tasktypes.structured import STRUCTURED
from tasks.tasktypes.toolcall import TOOLCALL
from tasks.recipe import Recipe, RecipeError

TASK_TYPES: dict[str, TaskType] = {t.name: t for t in (SLIPSTREAM, STRUCTURED, TOOLCALL, KEYWORD)}


def task_type(name: str) -> TaskType:
    """The registered task type called `name`.

    Raises:
        KeyError: naming the registered types.
    """
    try:
        return TASK_TYPES[name]
    except KeyError:
        raise KeyError(f"unknown task type {name!r}; registered: {sorted(TASK_TYPES)}") from None


def task_of(chat_row: dict) -> TaskType:
    """A chat row's task type; rows written before task types existed are slipstream rows."""
    return task_type(chat_row.get("task", "slipstream"))


def primary_metric(recipe: Recipe) -> str:
    """The metric the gates and the Fledgling decision compare: the recipe's choice, else the task's."""
    return recipe.eval.primary_metric or task_type(recipe.task).primary_metric


def check_recipe(recipe: Recipe) -> Recipe:
    """The recipe's task-type rules, checked before any work (the recipe model itself is plain data).

    Raises:
        RecipeError: the task is not registered, cannot train from data.format, eval.primary_metric is
            not one of its metrics, or deploy.constrain_output asks for a grammar the task does not have.
    """
    if recipe.task not in TASK_TYPES:
        raise RecipeError(f"recipe {recipe.name!r}: task {recipe.task!r} is not a registered task type; "
                          f"one of {sorted(TASK_TYPES)}")
    kind = TASK_TYPES[recipe.task]
    # Plain chat rows train any task: the test split then comes from data.test_file, in the task's own format.
    if recipe.data.format not in kind.data_formats and not (recipe.data.format == "messages"
                                                            and recipe.data.test_file):
        raise RecipeError(f"recipe {recipe.name!r}: task {kind.name!r} reads data.format "
                          f"{' or '.join(map(repr, kind.data_formats))} (the sharegpt loader is Slipstream TQT)")
    metric = recipe.eval.primary_metric
    if metric is not None and metric not in kind.metric_keys:
        raise RecipeError(f"recipe {recipe.name!r}: eval.primary_metric {metric!r} is not a {kind.name} metric; "
                          f"one of {kind.metric_keys}")
    if recipe.deploy.constrain_output and kind.grammar is None:
        raise RecipeError(f"recipe {recipe.name!r}: deploy.constrain_output needs an answer grammar, and task "
                          f"{kind.name!r} has none; task types with one: "
                          f"{sorted(t.name for t in TASK_TYPES.values() if t.grammar)}")
    return recipe
