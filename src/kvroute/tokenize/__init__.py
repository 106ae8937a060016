"""Tokenization: token ids for a request, from an engine's /tokenize or a local HF tokenizer."""

from kvroute.tokenize.caching import CachingTokenizer
from kvroute.tokenize.local import LocalTokenizer
from kvroute.tokenize.protocol import Tokenizer
from kvroute.tokenize.remote import RemoteTokenizer

__all__ = ["CachingTokenizer", "LocalTokenizer", "RemoteTokenizer", "Tokenizer"]
