"""The page's steps, one module each: its components (`layout(page)`), its callbacks, and their wiring
(`wire(page)`). ui.py lays them out in order and wires them once every component exists."""
