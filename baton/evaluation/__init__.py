"""Quality measurements of what baton delivers: views (what an adapter learned) and answers (facts through RAG)."""
