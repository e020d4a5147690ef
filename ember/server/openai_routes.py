"""Placeholder while the OpenAI routes are written."""

from fastapi import APIRouter

router = APIRouter()
