"""Names the command line shows before anything heavy is imported (`isoconv --help` loads no torch): the export
formats and `isoconv serve`'s defaults. interop/ takes them from here."""
FORMATS = ("onnx", "pt2", "torchscript", "safetensors")  # file formats of `isoconv export`
ONNX_EXPORTERS = ("dynamo", "legacy")
CALIBRATION_IMAGES = 512  # --int8: training images the quantization is calibrated on
FOLDER_FORMAT = "folder"  # `isoconv export --format folder`: a model folder in the Hugging Face Hub layout
EXPORT_FORMATS = (*FORMATS, FOLDER_FORMAT)
DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8000
MAX_UPLOAD_BYTES = 10 * 2 ** 20
