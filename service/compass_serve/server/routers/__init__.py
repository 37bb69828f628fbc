"""HTTP routes, each module building an APIRouter from the app's settings."""
