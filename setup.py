"""flamingo_jax: Flamingo (Alayrac et al., 2022) in JAX and Haiku."""

import setuptools

INSTALL_REQUIRES = [
    'absl-py',
    'av',  # PyAV (FFmpeg): decodes videos in flamingo_jax.data.formats.
    'chex',
    'clu',
    'dm-haiku==0.0.17',  # Without the [jax] extra: jax is pinned below.
    'einops',
    # orbax asks Cloud Storage's API whether a gs:// bucket has a hierarchical
    # namespace before it lists checkpoints: a gs:// workdir needs it.
    'google-cloud-storage',
    'jax>=0.10.2',
    'matplotlib',
    'ml_collections',
    'ml_dtypes',  # bfloat16/float8 numpy dtypes (flamingo_jax.weights).
    'numpy',
    'optax==0.2.8',
    'orbax-checkpoint>=0.12,<0.13',
    'importlib_resources',  # tensorflow-datasets needs it on Python 3.11.
    'pillow==13.0.0',  # The world's fingerprint pins rendered pixels.
    'pyarrow',  # Parquet and `datasets` folders in flamingo_jax.data.formats.
    'sentencepiece',
    'tensorboard',  # clu's metric writers import it.
    'tensorflow-cpu',
    'tensorflow-datasets',
]

# Apache Beam for distributed dataset builds (flamingo_jax.data.formats
# .distributed). 2.78.0 is the first release whose Pillow bound (<14) admits
# the pinned 13.0.0 (2.72 and 2.77 ask <13; 2.71 and older ask no Pillow but
# grpcio<1.66 and pyarrow<19); it asks protobuf<7 and pyarrow<26, i.e.
# 6.33.x and 25.x, which TensorFlow 2.21 and TFDS accept.
BEAM = ['apache-beam>=2.78.0']

EXTRAS_REQUIRE = {
    # pycocoevalcap: the reference CIDEr implementation the metric tests
    # compare against (pure Python; its tokenizer test also needs Java).
    # nbclient, nbformat, ipykernel: tests/test_notebook.py runs the notebook.
    # tokenizers: tests/data/test_imported_tokenizers.py (the hf extra).
    # Beam: tests/data/formats/test_distributed.py builds with it. It brings
    # protobuf 6.33 and pyarrow 25 in place of 7.x and 26; the whole suite
    # passes on them (1059 passed with Beam 2.78.0, protobuf 6.33.6, pyarrow
    # 25.0.1).
    # datasets: tests/data/formats/test_distributions.py writes a
    # save_to_disk folder with it (the reader itself needs only pyarrow).
    'test': ['pytest', 'pytest-xdist', 'pycocoevalcap', 'nbclient', 'nbformat',
             'ipykernel', 'tokenizers', 'datasets', *BEAM],
    'beam': BEAM,
    # A checkpoint's own Hugging Face tokenizer (data/hf_tokenizer.py).
    'hf': ['tokenizers'],
    # The reference implementations that tests/weights/make_fixtures.py
    # builds the parity fixtures with, and the live parity tests (skipped
    # without them). Never needed at run time: the importers read PyTorch
    # files without torch. timm and open_clip need torchvision.
    'parity': ['torch', 'torchvision', 'transformers', 'safetensors',
               'tokenizers', 'timm', 'open_clip_torch', 'dill'],
}

setuptools.setup(
    name='flamingo_jax',
    version='0.1.0',
    description='Flamingo visual language model in JAX/Haiku.',
    license='Apache-2.0',
    python_requires='>=3.11',
    packages=setuptools.find_packages(include=['flamingo_jax*', 'experiments*']),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
