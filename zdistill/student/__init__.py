"""The student's data plane: a DistillReader's producer, dispatcher, workers and sink."""
