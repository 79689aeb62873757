"""A faithful local stand-in for the Moonshot (Kimi) chat-completions API, over real HTTP.

Example:
    with SimServer(SimConfig(seed=0), port=0) as sim:
        client = OpenAI(base_url=sim.base_url, api_key="sk-test")
"""

from simulator.app import create_app
from simulator.cli import main
from simulator.config import SimConfig
from simulator.server import SimServer
from simulator.stats import max_in_window

__all__ = ["SimConfig", "SimServer", "create_app", "main", "max_in_window"]
