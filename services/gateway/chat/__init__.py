"""Chat with memory: retrieve for the latest question, pack the hits into the model's context budget, generate, cite.

``packing`` fits retrieved chunks into ``max_model_len - prompt - reserved answer tokens`` (counted by the inference
service's own tokenizer); ``prompt`` renders them as numbered sources and tells the model to cite ``[n]``;
``citations`` shapes what the client gets back; ``service`` runs a request end to end (no HTTP in it); the routes
in ``services/gateway/routes/chat.py`` speak OpenAI's protocol around it.
"""
