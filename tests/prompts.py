"""Twenty varied prompts (chat, code, math, lists, other languages) shared by the exactness tests."""

PROMPTS = [
    "What is the capital of France?",
    "Write a Python function that returns the n-th Fibonacci number.",
    "Explain photosynthesis to a ten-year-old.",
    "Solve for x: 3x + 7 = 22. Show your steps.",
    "List five fruits that are red.",
    "Translate 'good morning, how are you?' into Spanish.",
    "Write a haiku about the ocean.",
    "What are the main differences between TCP and UDP?",
    "Write a SQL query that counts the orders per customer.",
    "Give me three tips for a job interview.",
    "Summarise the plot of Romeo and Juliet in two sentences.",
    "How do I reverse a linked list in C?",
    "What is 17 multiplied by 23?",
    "Describe the water cycle.",
    "Write a short email asking my manager for a day off.",
    "Why is the sky blue?",
    "Write a bash one-liner that counts the lines of all .py files in a folder.",
    "What is the difference between a list and a tuple in Python?",
    "Name the planets of the solar system in order.",
    "Write a limerick about a cat who loves pizza.",
]
