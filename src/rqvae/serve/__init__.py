"""``rqvae serve``: a local web app to generate images and watch residual quantization at work.

:mod:`~rqvae.serve.models` finds and loads the models, :mod:`~rqvae.serve.engine` runs them (generation
jobs in worker threads, uploads, depth views), :mod:`~rqvae.serve.views` draws what the page shows of one
code map, :mod:`~rqvae.serve.store` keeps items and jobs, and :mod:`~rqvae.serve.app` is the Starlette app
(the page in ``static/`` and the JSON API).
"""
