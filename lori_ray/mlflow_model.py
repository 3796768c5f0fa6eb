"""The pyfunc model MLflow logs for a run's student or teacher, as code (MLflow's "models from code"): loading it
runs this file, so nothing pickled is read back from the artifact store."""

import mlflow

from lori_ray.tracking import PlainQuestions

mlflow.models.set_model(PlainQuestions())
