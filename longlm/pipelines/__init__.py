"""`transformers.pipeline` tasks that longlm provides."""
from longlm.pipelines.question_answering import ExtractiveQuestionAnsweringPipeline, register_question_answering

__all__ = ["ExtractiveQuestionAnsweringPipeline", "register_question_answering"]
