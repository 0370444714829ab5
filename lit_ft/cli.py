"""``lit-ft``: LightningCLI with lit_ft's callbacks, modules and DataModules importable by short name, CSV logs by
default, the resolved config saved to every logger (W&B included), and a before/after summary after ``fit``.

``lit-ft techniques`` lists the registered techniques (name, class, family, paper, arXiv id, config, doc page);
``lit-ft configs`` lists the packaged configs, which ``--config NAME`` runs from any directory (lit_ft.config_files)."""

from __future__ import annotations

import inspect
import sys
import textwrap
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger

from lit_ft.cli_output import StepProgressBar, quiet_dependencies
from lit_ft.cli_quick import apply_quick_mode
from lit_ft.config_files import UnknownConfigError, configs_table, resolve_config_args


class LoggerSaveConfigCallback(SaveConfigCallback):
    """Writes ``config.yaml`` into the log dir (Lightning's default) and also pushes it to a W&B run's config."""

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                cfg = self.parser.dump(self.config, skip_none=False, format="json")
                import json

                logger.experiment.config.update({"lit_ft_config": json.loads(cfg)}, allow_val_change=True)


def _callbacks_epilog() -> str:
    """A help section listing every lit_ft callback with its arguments and their docs (from the docstrings)."""
    import lit_ft.callbacks as cbs

    lines = ["lit_ft callbacks (add with --trainer.callbacks+=NAME, or in YAML as class_path: lit_ft.callbacks.NAME):"]
    for name in [*cbs.__all__, *cbs.UTILITIES]:
        cls = getattr(cbs, name)
        sig = inspect.signature(cls.__init__)
        params = [p for p in sig.parameters.values() if p.name != "self"]
        lines.append(f"  {name}(" + ", ".join(f"{p.name}={p.default!r}" for p in params) + ")")
        doc = inspect.getdoc(cls) or ""
        summary = doc.split("\n\n")[0].replace("\n", " ")
        lines.append(textwrap.indent(textwrap.fill(summary, 100), "      "))
        if "Args:" in doc:
            args_block = doc.split("Args:", 1)[1]
            lines.append(textwrap.indent(textwrap.dedent(args_block).strip(), "      "))
    lines.append("  Full help of one: lit-ft fit --trainer.callbacks.help NAME")
    return "\n".join(lines)


class LitFtCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.set_defaults(
            {
                "trainer.logger": {
                    "class_path": "lightning.pytorch.loggers.CSVLogger",
                    "init_args": {"save_dir": "runs", "name": "lit_ft"},
                }
            }
        )

        parser.add_argument(
            # nargs="?": a bare `--quick` (as the README writes it) means true; `--quick=false` still parses
            "--quick", type=bool, nargs="?", const=True, default=False,
            help="a few-step run of the same config that still shows something: max_steps <= 5, one validation at "
                 "the end, metrics logged every step, small held-out and generation sets (lit_ft.cli_quick)",
        )

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        if getattr(cfg, "quick", False):
            changes = apply_quick_mode(cfg)
            print("lit-ft --quick: " + ("; ".join(changes) if changes else "the config is already that small"))

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Any]) -> Trainer:
        # Lightning's default rich bar prints "Epoch 0/-2" for max_steps runs; ours, unless the user chose a bar
        from lightning.pytorch.callbacks import ProgressBar
        from lightning.pytorch.callbacks.progress.rich_progress import _RICH_AVAILABLE

        configured = list(config.get("callbacks") or []) + list(callbacks)
        if (_RICH_AVAILABLE and config.get("enable_progress_bar", True) is not False
                and not any(isinstance(c, ProgressBar) for c in configured)):
            callbacks = [*callbacks, StepProgressBar()]
        return super()._instantiate_trainer(config, callbacks)

    def after_fit(self) -> None:
        trainer, model = self.trainer, self.model
        if trainer.global_rank != 0:
            return
        before = getattr(model, "eval_history", {}).get("before", {})
        after = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        print("\n=== lit-ft fit finished ===")
        if before or after:
            keys = sorted({k.split("/", 1)[1] for k in list(before) + list(after)})
            print(f"{'metric':<16}{'before':>12}{'after':>12}")
            for k in keys:
                b, a = before.get(f"val_before/{k}"), after.get(f"val/{k}")
                fb = f"{b:12.4f}" if b is not None else f"{'-':>12}"
                fa = f"{a:12.4f}" if a is not None else f"{'-':>12}"
                print(f"{k:<16}{fb}{fa}")
        for logger in trainer.loggers:
            where = getattr(logger, "log_dir", None) or getattr(logger, "save_dir", None)
            print(f"logs ({type(logger).__name__}): {where}")
        ckpt = trainer.checkpoint_callback
        if ckpt is not None and getattr(ckpt, "dirpath", None):
            print(f"checkpoints: {ckpt.dirpath}")
        for cb in trainer.callbacks:  # what techniques wrote (prompt / adapter artifacts, ...)
            resolve = getattr(cb, "resolved_save_dir", None)
            where = resolve(trainer) if callable(resolve) else None
            if where:
                print(f"artifact ({type(cb).__name__}): {where}")


def run(args: list[str] | dict[str, Any] | None = None) -> LitFtCLI:
    """Run the CLI in-process and return the LightningCLI object (trainer, model, datamodule) — for tests and
    notebooks. The console script is :func:`main`. ``--config NAME`` (a list of arguments, or ``sys.argv``) names
    a packaged config unless NAME is an existing file (:func:`lit_ft.config_files.resolve_config`).

    Raises:
        UnknownConfigError: a ``--config`` value is neither a file nor a packaged config's name.
    """
    quiet_dependencies()
    if args is None:  # rewritten in place: LightningCLI warns when given both args and command-line arguments
        sys.argv[1:] = resolve_config_args(sys.argv[1:])
    elif isinstance(args, list):
        args = resolve_config_args(args)
    import lit_ft.callbacks  # noqa: F401  short class names resolve once imported
    import lit_ft.data  # noqa: F401
    import lit_ft.modules  # noqa: F401

    epilog = _callbacks_epilog()
    return LitFtCLI(
        model_class=LightningModule,
        datamodule_class=None,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_callback=LoggerSaveConfigCallback,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={
            "fit": {"epilog": epilog},
            "validate": {"epilog": epilog},
        },
        args=args,
        auto_configure_optimizers=False,
    )


def techniques_table() -> str:
    """``lit-ft techniques``: one block per registered technique, by family then name (plain text, so it greps)."""
    from lit_ft.callbacks import techniques

    records = techniques()
    head = ("name", "class", "family", "arXiv", "config", "doc")
    rows = [(r.name, r.cls.__name__, r.family, r.arxiv or "-", r.config, r.doc) for r in records]
    widths = [max(len(row[i]) for row in [head, *rows]) for i in range(len(head))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*head).rstrip(), fmt.format(*("-" * w for w in widths))]
    for record, row in zip(records, rows):
        lines.append(fmt.format(*row).rstrip())
        lines.append(f"    paper: {record.paper}")
    lines.append(f"{len(records)} techniques; add one with --trainer.callbacks+=CLASS or --config <name> (its config)")
    return "\n".join(lines)


def main(args: list[str] | None = None) -> None:
    """The ``lit-ft`` console script (returns None so that ``sys.exit(main())`` exits 0). ``lit-ft techniques``
    prints :func:`techniques_table`, ``lit-ft configs`` the packaged configs; everything else goes to LightningCLI
    (an unknown ``--config`` name exits with a message listing the packaged ones)."""
    argv = sys.argv[1:] if args is None else list(args)
    listings = {"techniques": techniques_table, "configs": configs_table}
    if argv[:1] and argv[0] in listings:
        if len(argv) > 1:
            raise SystemExit(f"lit-ft {argv[0]} takes no arguments, got {argv[1:]}")
        print(listings[argv[0]]())
        return
    try:
        run(args)
    except UnknownConfigError as e:
        raise SystemExit(f"lit-ft: {e}") from None


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
