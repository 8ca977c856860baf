"""Routes of the example project."""

from django.urls import path

from exampleproject import views

urlpatterns = [
    path("users/<int:user_id>", views.user),
    path("computations", views.computations),
]
