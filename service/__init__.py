"""The ptq4dm inference service (API, queue, workers). Imports `quantizer`; never the other way round."""
