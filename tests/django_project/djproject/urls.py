"""One view behind ``cache_page``: it counts its own calls, so a test sees a hit."""

from django.http import HttpRequest, HttpResponse
from django.urls import path
from django.views.decorators.cache import cache_page

calls = {"n": 0}


@cache_page(60)
def counted(request: HttpRequest) -> HttpResponse:
    calls["n"] += 1
    return HttpResponse(f"call {calls['n']}")


urlpatterns = [path("counted/", counted)]
