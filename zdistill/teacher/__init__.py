"""zdistill-teacher: the server, its dynamic batcher, model instances and the models it serves."""
