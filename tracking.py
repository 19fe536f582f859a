"""Optional experiment tracking (--tensorboard, --mlflow): each epoch's scalars (losses, accuracy, macro-F1,
AUC, learning rate), at the end the run's pictures and its hyper-parameters with the final scores. Each
tracker is imported only when asked for; a missing package is one line saying how to install it. TensorBoard
writes OUTPUT/tensorboard/; MLflow logs to MLFLOW_TRACKING_URI, or to its own default (mlflow 3: a local
./mlflow.db)."""

from pathlib import Path

from errors import UsageError, one_line

SCALARS = ("train_loss", "train_acc", "val_loss", "val_acc", "val_macro_f1", "val_auc", "val_map", "lr")
PICTURES = ("results.png", "confusion_matrix.png", "roc.png", "calibration.png", "val_predictions.jpg", "val_cam.jpg")


class Trackers:
    """The trackers a run asked for, fed by train.py on rank 0 only (nothing to feed when none was asked for)."""

    def __init__(self, args, output_dir, is_main=True):
        self.writers, self.output_dir = [], Path(output_dir)
        if not is_main:
            return
        if args.tensorboard:
            self.writers.append(TensorBoard(self.output_dir / "tensorboard"))
        if args.mlflow:
            self.writers.append(MLflow(self.output_dir))

    def epoch(self, row):
        for writer in self.writers:
            writer.scalars({k: float(row[k]) for k in SCALARS if k in row and row[k] is not None}, row["epoch"])

    def finish(self, args):
        """The pictures of the run folder and the hyper-parameters with the final validation scores."""
        if not self.writers:
            return
        import csv

        scores = {}
        if (self.output_dir / "report.csv").is_file():
            with open(self.output_dir / "report.csv", newline="", encoding="utf-8") as f:
                scores = {f"final/{row['label']}": float(row["value"]) for row in csv.DictReader(f) if row.get("value")}
        hyper = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        for writer in self.writers:
            for name in PICTURES:
                if (self.output_dir / name).is_file():
                    writer.picture(name, self.output_dir / name)
            writer.hyper_parameters(hyper, scores)
            writer.close()


def _missing(flag, package):
    raise UsageError(f"{flag} needs the {package} package: pip install {package}") from None


class TensorBoard:
    def __init__(self, folder):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            _missing("--tensorboard", "tensorboard")
        self.writer = SummaryWriter(str(folder))

    def scalars(self, values, step):
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def picture(self, name, path):
        import torch
        from torchvision.io import ImageReadMode, decode_image

        data = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)  # the run's own PNG or JPEG
        self.writer.add_image(name, decode_image(data, ImageReadMode.RGB), dataformats="CHW")

    def hyper_parameters(self, hyper, scores):
        self.writer.add_hparams({k: ("" if v is None else v) for k, v in hyper.items()}, scores or {"final/none": 0.0},
                                run_name=".")  # fmt: skip

    def close(self):
        self.writer.close()


class MLflow:
    def __init__(self, output_dir):
        try:
            import mlflow
        except ImportError:
            _missing("--mlflow", "mlflow")
        self.mlflow = mlflow
        try:
            mlflow.start_run(run_name=Path(output_dir).name)
        except Exception as e:  # MLflow's own errors (a store it cannot open) have no common base to name
            raise UsageError(f"--mlflow: {one_line(e)[:300]}") from None

    def scalars(self, values, step):
        self.mlflow.log_metrics(values, step=step)

    def picture(self, name, path):
        self.mlflow.log_artifact(str(path))

    def hyper_parameters(self, hyper, scores):
        self.mlflow.log_params({k: str(v)[:250] for k, v in hyper.items()})
        self.mlflow.log_metrics({k.replace("final/", "final_").replace(" ", "_"): v for k, v in scores.items()})

    def close(self):
        self.mlflow.end_run()
