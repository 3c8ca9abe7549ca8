"""mlmjax: masked-language-model pretraining and adaptation in JAX/Flax."""

import os

# TensorFlow (tf.data only) must stay quiet and off the accelerators JAX owns.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')

__version__ = '0.1.0'
