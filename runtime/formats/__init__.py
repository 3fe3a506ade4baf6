"""Weight formats: conversion of foreign formats into what the adapters load."""
